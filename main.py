from uadkit.cli import entry

# Guarded: worker processes started with "spawn" re-import this module and must not rerun the CLI.
if __name__ == "__main__":
    entry()

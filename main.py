from uadkit.cli import entry

entry()

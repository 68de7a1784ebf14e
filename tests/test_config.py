import pytest

from uadkit.config import load_config, parse_override
from uadkit.errors import UadkitError
from uadkit.models import MODELS


def test_defaults_file_and_overrides_merge_with_yaml_types():
    cfg = load_config("configs/STFPM.yaml", ["Train.epochs_iters=3", "Model.input_size=[128, 96]",
                                            "Predict.threshold=0.7", "Global.dataset_dir=/data/x"])
    assert cfg["Train"]["epochs_iters"] == 3 and cfg["Model"]["input_size"] == [128, 96]
    assert cfg["Predict"]["threshold"] == 0.7 and cfg["Global"]["dataset_dir"] == "/data/x"
    assert cfg["Train"]["learning_rate"] == 0.4 and cfg["Model"]["anomaly_map_mode"] == "product"
    assert cfg["Train"]["calibration"]["false_alarm_rate"] == 0.05


def test_unknown_key_names_key_and_suggests():
    with pytest.raises(UadkitError, match=r"unknown config key 'Train.epoch'.*Train.epochs_iters"):
        load_config("configs/STFPM.yaml", ["Train.epoch=3"])
    with pytest.raises(UadkitError, match="unknown config key 'Nope.x'"):
        load_config(None, ["Nope.x=1"])


def test_unknown_key_in_yaml_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("Global:\n  model: STFPM\nTrain:\n  lr: 0.1\n")
    with pytest.raises(UadkitError, match="Train.lr"):
        load_config(str(p))


@pytest.mark.parametrize("override,needle", [
    ("Train.epochs_iters=abc", "Train.epochs_iters"),
    ("Train.epochs_iters=0", "positive integer"),
    ("Train.step_budget=0", r"^config key 'Train.step_budget': expected a positive integer or null, got 0$"),
    ("Train.step_budget=many", "Train.step_budget"),
    ("Train.epochs_iters=null", "both null"),  # STFPM's step_budget is null too: nothing says how long
    ("Global.mode=fly", "Global.mode"),
    ("Model.input_size=[10]", "Model.input_size"),
    ("Predict.threshold=2", "Predict.threshold"),
    ("Global.model=NoSuchModel", "unknown model 'NoSuchModel'"),
    ("Train.batch_size=1.5", "Train.batch_size"),
    ("Global.device=tpu", "Global.device"),
    ("Train.calibration.false_alarm_rate=0.5", "Train.calibration.false_alarm_rate"),
    ("Calibrate.false_alarm_rate=[]", "Calibrate.false_alarm_rate"),
    ("Train.calibration.estimator=guess", "Train.calibration.estimator"),
    ("Train.calibration.out_of_fold_images=2", "Train.calibration.out_of_fold_images"),
    ("Evaluate.run_mode=tensorrt", "Evaluate.run_mode"),
    ("Model.map_border=mirror", r"^config key 'Model.map_border': expected mean or clamp, got 'mirror'$"),
])
def test_bad_values_are_errors_naming_the_key(override, needle):
    with pytest.raises(UadkitError, match=needle):
        load_config("configs/STFPM.yaml", [override])


def test_override_syntax():
    assert parse_override("A.b=1") == (["A", "b"], 1)
    assert parse_override("A.b.c=[1, 2]") == (["A", "b", "c"], [1, 2])
    assert parse_override("A.b=null") == (["A", "b"], None)
    with pytest.raises(UadkitError, match="Section.key=value"):
        parse_override("nokey")


def test_missing_or_invalid_config_file(tmp_path):
    with pytest.raises(UadkitError, match="does not exist"):
        load_config(str(tmp_path / "none.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("Global: [unclosed\n")
    with pytest.raises(UadkitError, match="not valid YAML"):
        load_config(str(bad))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_each_models_config_file_states_its_code_defaults(name):
    """configs/<Model>.yaml is what users read and `create_model(name)` is what the code does: a default
    changed in one place and not the other fails here (the file may leave keys out, never contradict)."""
    import yaml

    from uadkit.config import schema_for

    with open(f"configs/{name}.yaml", encoding="utf-8") as f:
        data = yaml.safe_load(f)
    schema = schema_for(name)

    def walk(file_part, code_part, path):
        for key, value in file_part.items():
            if isinstance(value, dict) and isinstance(code_part.get(key), dict):
                walk(value, code_part[key], f"{path}.{key}")
            elif key in code_part and key not in ("mode", "dataset_dir", "output", "model"):
                assert value == code_part[key], f"configs/{name}.yaml {path}.{key}: {value!r}, code {code_part[key]!r}"

    for section in ("Global", "Model", "Train", "Evaluate", "Predict", "Export", "Calibrate"):
        walk(data.get(section) or {}, schema[section], section)


def test_efficientads_null_epochs_are_still_type_checked():
    # EfficientAD's epochs_iters defaults to null (its step budget decides): a wrong value must not slip through
    with pytest.raises(UadkitError, match=r"'Train.epochs_iters': expected a positive integer or null, got 'ten'"):
        load_config("configs/EfficientAD.yaml", ["Train.epochs_iters=ten"])
    with pytest.raises(UadkitError, match="both null"):
        load_config("configs/EfficientAD.yaml", ["Train.step_budget=null"])
    cfg = load_config("configs/EfficientAD.yaml", ["Train.epochs_iters=3"])
    assert cfg["Train"]["epochs_iters"] == 3 and cfg["Train"]["step_budget"] == 5400

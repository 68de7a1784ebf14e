import numpy as np
import pytest
import torch
from conftest import ASSETS
from PIL import Image

from uadkit.backbones import FeatureExtractor, backbone_info, build_classifier
from uadkit.backbones.efficientnet_lite import SameConv2d
from uadkit.backbones.resnet import resnet18, wide_resnet50_2
from uadkit.errors import UadkitError

# ImageNet classes: 281-285 are domestic cats (tabby, tiger cat, Persian, Siamese, Egyptian cat); 967 espresso.
CATS = set(range(281, 286))
ESPRESSO = 967


def _photo(name: str, backbone: str) -> torch.Tensor:
    im = np.asarray(Image.open(f"{ASSETS}/{name}.jpg").convert("RGB").resize((224, 224)), dtype=np.float32) / 255
    info = backbone_info(backbone)
    x = (im - np.array(info.mean, np.float32)) / np.array(info.std, np.float32)
    return torch.from_numpy(x).permute(2, 0, 1)[None]


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite2"])
def test_lite_weights_are_real_imagenet(name):
    net = build_classifier(name)
    with torch.no_grad():
        cat = net(_photo("chelsea", name)).softmax(1)
        cup = net(_photo("coffee", name)).softmax(1)
    assert int(cat.argmax()) in CATS and float(cat[0, list(CATS)].sum()) > 0.8
    assert int(cup.argmax()) == ESPRESSO


def test_stage_shapes_and_strides():
    fe = FeatureExtractor("efficientnet_lite0", ["stage2", "stage3", "stage5"])
    feats = fe(torch.rand(2, 3, 256, 256))
    assert [tuple(f.shape) for f in feats] == [(2, 24, 64, 64), (2, 40, 32, 32), (2, 112, 16, 16)]
    assert fe.strides == [4, 8, 16] and fe.channels == [24, 40, 112]


def test_same_padding_is_tensorflows():
    # TF "SAME" with stride 2 on an even input pads only right/bottom: output pixel (0, 0) sees input rows 0..2.
    conv = SameConv2d(1, 1, 3, stride=2, bias=False)
    conv.weight.data.fill_(1.0)
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 0, 0] = 1.0
    y = conv(x).detach()
    assert y.shape[-2:] == (4, 4) and float(y[0, 0, 0, 0]) == 1.0
    x2 = torch.zeros(1, 1, 8, 8)
    x2[0, 0, 7, 7] = 1.0
    assert float(conv(x2).detach()[0, 0, 3, 3]) == 1.0  # the padded pixel is on the far side


def test_symmetric_padding_pads_evenly_with_the_same_output_size():
    conv = SameConv2d(1, 1, 3, stride=2, bias=False)
    conv.weight.data.fill_(1.0)
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 2, 2] = 1.0
    assert float(conv(x).detach()[0, 0, 0, 0]) == 1.0  # TensorFlow's: output (0, 0) sees input rows 0..2
    conv.symmetric = True
    y = conv(x).detach()  # evenly: output (i, j) sees rows 2i-1..2i+1, a padded row and column on each side
    assert y.shape[-2:] == (4, 4) and float(y[0, 0, 0, 0]) == 0.0 and float(y[0, 0, 1, 1]) == 1.0


def test_unknown_stage_and_backbone_are_clear_errors():
    with pytest.raises(UadkitError, match="stage9"):
        FeatureExtractor("efficientnet_lite0", ["stage9"])
    with pytest.raises(UadkitError, match="unknown backbone 'vgg'"):
        FeatureExtractor("vgg", ["x"])


def test_resnets_use_torchvision_key_names_and_load_a_local_file(tmp_path):
    r18 = resnet18(with_head=True).state_dict()
    assert r18["layer4.1.conv2.weight"].shape == (512, 512, 3, 3) and r18["fc.weight"].shape == (1000, 512)
    assert "layer2.0.downsample.0.weight" in r18 and "layer2.0.downsample.1.running_var" in r18
    w50 = wide_resnet50_2(with_head=True).state_dict()
    assert w50["layer1.0.conv2.weight"].shape == (128, 128, 3, 3)  # width 128 = "wide"
    assert w50["layer4.2.conv3.weight"].shape == (2048, 1024, 1, 1) and w50["fc.weight"].shape == (1000, 2048)
    # A torchvision-format checkpoint file (head included) loads through Model.pretrained_path.
    ref = resnet18(with_head=True)
    torch.save(ref.state_dict(), tmp_path / "r18.pth")
    fe = FeatureExtractor("resnet18", ["layer1", "layer2", "layer3"], pretrained_path=str(tmp_path / "r18.pth"))
    assert torch.equal(fe.trunk.layer3[1].conv2.weight, ref.layer3[1].conv2.weight)
    assert [f.shape[1] for f in fe(torch.rand(1, 3, 64, 64))] == [64, 128, 256]


def test_resnet_offline_without_file_says_how_to_provide_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def offline(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(UadkitError, match="pretrained_path") as e:
        FeatureExtractor("wide_resnet50_2", ["layer2"])
    assert "wide_resnet50_2-32ee1156.pth" in str(e.value)


def test_bad_pretrained_path(tmp_path):
    with pytest.raises(UadkitError, match="no such file"):
        FeatureExtractor("resnet18", ["layer1"], pretrained_path=str(tmp_path / "nope.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UadkitError, match="not a torch state_dict"):
        FeatureExtractor("resnet18", ["layer1"], pretrained_path=str(tmp_path / "junk.pth"))


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet18", "wide_resnet50_2"])
def test_a_slimmer_trunk_has_the_same_stages_and_outputs_for_fewer_weights(name):
    stages = backbone_info(name).stfpm_stages
    full = FeatureExtractor(name, stages, pretrained=False)
    slim = FeatureExtractor(name, stages, pretrained=False, inner=0.5)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert [f.shape for f in slim(x)] == [f.shape for f in full(x)]
    n_full, n_slim = (sum(p.numel() for p in m.parameters()) for m in (full, slim))
    assert n_slim < 0.7 * n_full
    with pytest.raises(ValueError, match="full-width"):  # ImageNet weights are for the full trunk only
        FeatureExtractor(name, stages, pretrained=True, inner=0.5)


@pytest.mark.parametrize(("name", "stage", "blocks"), [("efficientnet_lite0", "stage2", 3),
                                                        ("efficientnet_lite0", "stage3", 5),
                                                        ("resnet18", "layer1", 2), ("resnet18", "layer2", 4),
                                                        ("wide_resnet50_2", "layer2", 7)])
def test_leading_modules_compute_a_stage_through_its_last_block(name, stage, blocks):
    fe = FeatureExtractor(name, backbone_info(name).stfpm_stages, pretrained=False).eval()
    trunk = fe.trunk
    assert trunk.blocks_through(stage) == blocks
    names = trunk.leading_modules(blocks)
    x = torch.rand(1, 3, 64, 64)
    y = (x - fe.mean) / fe.std
    with torch.no_grad():
        for i, n in enumerate(names):  # the stem's convolution, its BatchNorm (then the activation), the blocks
            y = trunk.get_submodule(n)(y)
            if i == 1:
                y = torch.nn.functional.relu6(y) if name.startswith("efficientnet") else trunk.maxpool(trunk.relu(y))
        torch.testing.assert_close(y, trunk.forward_stages((x - fe.mean) / fe.std, [stage])[stage])
        # starting after the first k blocks from their output gives every later stage as the whole trunk does
        whole = fe(x)
        for k in range(blocks):
            prefix = trunk.forward_prefix((x - fe.mean) / fe.std, k)
            later = [s for s in fe.stages if trunk.blocks_through(s) > k]
            feats = trunk.forward_stages(prefix, later, start=k)
            for s in later:
                torch.testing.assert_close(feats[s], whole[fe.stages.index(s)])
            stages, kept = fe.forward_with_prefix(x, k)
            torch.testing.assert_close(kept, prefix)
            for a, b in zip(stages, whole, strict=True):
                torch.testing.assert_close(a, b)
        with pytest.raises(ValueError, match="ends within the first"):
            trunk.forward_stages(trunk.forward_prefix(x, blocks), [stage], start=blocks)

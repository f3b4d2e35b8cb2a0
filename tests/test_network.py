"""The guide-aware network wrapper: guides entering every encoder stage (``guide_entry``)."""
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from torch import nn

from nnunet_guide.network import ExtraChannelNetwork, StageGuides, automatic_norm_statistics
from nnunet_guide.settings import GuidedTarget, GuideSettings, GuideSettingsError, build_layout

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONV = {2: nn.Conv2d, 3: nn.Conv3d}
NORM = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}


def layout(entry: str, norm_statistics: str = "with_guides"):
    return build_layout(1, [GuidedTarget("organ", (1,)), GuidedTarget("lesion", (2,))],
                        GuideSettings(guide_entry=entry, norm_statistics=norm_statistics), ["CT"])


def unet(dim: int, residual: bool = False, deep_supervision: bool = False) -> nn.Module:
    kw = dict(input_channels=layout("input").num_channels, n_stages=3, features_per_stage=(4, 8, 16),
              conv_op=CONV[dim], kernel_sizes=3, strides=(1, 2, 2), num_classes=3, conv_bias=True,
              norm_op=NORM[dim], norm_op_kwargs={"affine": True}, nonlin=nn.LeakyReLU,
              deep_supervision=deep_supervision)
    if residual:
        return ResidualEncoderUNet(n_blocks_per_stage=(1, 1, 1), n_conv_per_stage_decoder=(1, 1), **kw)
    return PlainConvUNet(n_conv_per_stage=1, n_conv_per_stage_decoder=1, **kw)


def pair(dim: int, residual: bool = False, deep_supervision: bool = False):
    """The same base weights wrapped with guides at the input only and at every stage."""
    torch.manual_seed(0)
    base = unet(dim, residual, deep_supervision)
    staged = unet(dim, residual, deep_supervision)
    staged.load_state_dict(base.state_dict())
    return (ExtraChannelNetwork(base, layout("input")).eval(),
            ExtraChannelNetwork(staged, layout("every_stage")).eval())


def clicked_input(dim: int, shape):
    torch.manual_seed(1)
    x = torch.zeros(2, 5, *shape)
    x[:, 0] = torch.randn(2, *shape)
    centre = tuple(s // 2 for s in shape)
    x[(0, 2) + centre] = 1.0                                     # a positive lesion click, sample 0
    return x


@pytest.mark.parametrize("dim,residual", [(2, False), (3, False), (3, True)])
def test_untrained_stage_guides_change_nothing_and_learn_to(dim, residual):
    shape = (16, 16) if dim == 2 else (8, 16, 16)
    plain, staged = pair(dim, residual)
    assert plain.stage_guides is None and isinstance(staged.stage_guides, StageGuides)
    assert len(staged.stage_guides.proj) == 3
    x = clicked_input(dim, shape)
    with torch.no_grad():
        assert torch.equal(plain(x), staged(x))                  # zero-initialised: the input-only network
        assert torch.equal(plain(x[:, :1]), staged(x[:, :1]))    # automatic mode, stock nnU-Net's input
    staged.train()
    staged(x).square().mean().backward()
    for p in staged.stage_guides.proj:
        assert p.weight.grad.abs().sum() > 0                     # the projections train


@pytest.mark.parametrize("dim", [2, 3])
def test_a_click_reaches_the_coarsest_stage(dim):
    """With the projection of the last stage alone set, a click changes the output, and only on
    the clicked sample: the pooled guide reaches the coarse grid, per sample."""
    shape = (16, 16) if dim == 2 else (8, 16, 16)
    plain, staged = pair(dim)
    last = staged.stage_guides.proj[-1]
    with torch.no_grad():
        last.weight.fill_(1.0)
        x = clicked_input(dim, shape)
        a, b = plain(x), staged(x)
        assert not torch.allclose(a[0], b[0], atol=1e-4)
        torch.testing.assert_close(a[1], b[1])
        auto = x.clone()
        auto[:, 1:] = 0
        torch.testing.assert_close(plain(auto), staged(auto))   # no click: zero bias, no change


def test_deep_supervision_outputs_are_kept():
    plain, staged = pair(3, deep_supervision=True)
    x = clicked_input(3, (8, 16, 16))
    with torch.no_grad():
        a, b = plain(x), staged(x)
    assert isinstance(b, (list, tuple)) and len(a) == len(b) == 2
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def test_settings_and_architectures_that_cannot_take_stage_guides():
    with pytest.raises(GuideSettingsError, match="unknown guide entry 'decoder'.*input, every_stage"):
        GuideSettings(guide_entry="decoder")
    assert GuideSettings.from_dict({}).guide_entry == "input"    # settings files written before the field
    assert GuideSettings.from_dict(GuideSettings(guide_entry="every_stage").to_dict()).guide_entry == "every_stage"

    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv3d(5, 3, 1)

        def forward(self, x):
            return self.conv(x)

    with pytest.raises(GuideSettingsError, match="Flat does not.*guide_entry 'input'"):
        ExtraChannelNetwork(Flat(), layout("every_stage"))
    ExtraChannelNetwork(Flat(), layout("input"))                 # input-only wraps anything


@pytest.mark.parametrize("dim", [2, 3])
def test_a_click_keeps_its_peak_on_coarse_grids(dim):
    """A one-voxel click pooled to a 4x coarser grid keeps its value (max-pooling, not averaging)
    in the coarse voxel that holds it, and nowhere else."""
    sg = StageGuides(1, [2], CONV[dim])
    with torch.no_grad():
        sg.proj[0].weight.fill_(1.0)
    fine = (8,) * dim
    guides = torch.zeros(1, 1, *fine)
    guides[(0, 0) + (5,) * dim] = 0.7
    out = sg(0, torch.zeros(1, 2, *(2,) * dim), guides)
    expected = torch.zeros(1, 2, *(2,) * dim)
    expected[(slice(None), slice(None)) + (1,) * dim] = 0.7
    torch.testing.assert_close(out, expected)


def stats_pair(entry: str = "input", deep_supervision: bool = False):
    """The same 2D weights, normalised with the guides (nnU-Net's way) and with automatic statistics."""
    torch.manual_seed(0)
    base = unet(2, deep_supervision=deep_supervision)
    other = unet(2, deep_supervision=deep_supervision)
    other.load_state_dict(base.state_dict())
    nets = (ExtraChannelNetwork(base, layout(entry)), ExtraChannelNetwork(other, layout(entry, "automatic")))
    if entry == "every_stage":
        with torch.no_grad():
            for net in nets:
                for p in net.stage_guides.proj:
                    p.weight.fill_(0.5)
    return nets


@pytest.mark.parametrize("entry", ["input", "every_stage"])
def test_automatic_norm_statistics_keep_a_click_local(entry):
    """A click in one corner of a 64x64 image, far beyond the 3-stage U-Net's receptive field: with
    nnU-Net's instance norms it moves the output in the opposite corner (the click shifts every
    feature map's mean and variance); with the automatic statistics the far corner is exactly the
    automatic output, while the click still acts near itself. A sample without clicks in the same
    batch is normalised as nnU-Net normalises."""
    shared, automatic = stats_pair(entry)
    torch.manual_seed(1)
    x = torch.zeros(2, 5, 64, 64)
    x[:, 0] = torch.randn(2, 64, 64)
    x[0, 3, 1:5, 1:5] = 1.0                                   # a positive lesion click (a 4x4 blob), sample 0
    with torch.no_grad():
        auto_shared, auto_automatic = shared(x[:, :1]), automatic(x[:, :1])
        torch.testing.assert_close(auto_shared, auto_automatic, rtol=0, atol=0)  # automatic mode: unchanged
        a, b = shared(x), automatic(x)
    far = (slice(None), slice(40, None), slice(40, None))
    assert (a[0][far] - auto_shared[0][far]).abs().max() > 1e-4     # nnU-Net's norms: the click moves the far corner
    torch.testing.assert_close(b[0][far], auto_automatic[0][far], rtol=1e-5, atol=1e-5)
    assert (b[0][:, :8, :8] - auto_automatic[0][:, :8, :8]).abs().max() > 1e-3  # and still acts where it is
    torch.testing.assert_close(b[1], a[1], rtol=1e-5, atol=1e-5)   # sample 1 has no click


def test_automatic_norm_statistics_train_and_keep_deep_supervision():
    shared, automatic = stats_pair(deep_supervision=True)
    automatic.train()
    torch.manual_seed(2)
    x = torch.zeros(2, 5, 32, 32)
    x[:, 0] = torch.randn(2, 32, 32)
    x[1, 2, 10:12, 10:12] = 1.0
    out = automatic(x)
    assert isinstance(out, (list, tuple)) and len(out) == 2
    sum(o.square().mean() for o in out).backward()
    grads = [p.grad for p in automatic.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    first_conv = automatic.base.encoder.stages[0][0].convs[0].conv
    assert first_conv.weight.grad[:, 2].abs().sum() > 0  # the guide's weights train
    assert automatic._norm_statistics.mode is None and not automatic._norm_statistics.stats


def test_automatic_norm_statistics_keep_the_loss_invariant_to_a_layers_scale():
    """An instance norm makes the loss invariant to the scale of the convolution before it, so its
    gradient is orthogonal to that convolution's weights and bias, and they do not grow. With the
    automatic statistics of a clicked sample the same must hold: the statistics come from the same
    weights (the automatic pass), and keep their gradient in training. Statistics kept apart from
    the graph break it (the weights before each norm grew 3-10x in a LiTS training, and its tumour
    class never came alive)."""
    _, automatic = stats_pair()
    automatic.train()
    torch.manual_seed(3)
    x = torch.zeros(2, 5, 32, 32)
    x[:, 0] = torch.randn(2, 32, 32)
    x[:, 3, 4:8, 4:8] = 1.0                                   # both samples clicked
    target = torch.randn(2, 3, 32, 32)
    ((automatic(x) - target) ** 2).mean().backward()
    for conv in (automatic.base.encoder.stages[0][0].convs[0].conv, automatic.base.encoder.stages[1][0].convs[0].conv):
        w, b = conv.weight, conv.bias
        radial = (w.grad * w).sum() + (b.grad * b).sum()
        scale = torch.cat((w.grad.flatten(), b.grad.flatten())).norm() * torch.cat((w.flatten(), b.flatten())).norm()
        assert scale > 0 and radial.abs() < 1e-3 * scale


def test_norm_statistics_setting():
    with pytest.raises(GuideSettingsError, match="unknown norm_statistics 'batch'.*with_guides, automatic"):
        GuideSettings(norm_statistics="batch")
    assert GuideSettings.from_dict({}).norm_statistics == "with_guides"   # settings files written before the field
    assert GuideSettings.from_dict(GuideSettings(norm_statistics="automatic").to_dict()).norm_statistics == "automatic"


def test_automatic_norm_statistics_found_through_wrappers():
    """The trainer finds the statistics of its network compiled (``_orig_mod``) or in DDP (``module``)."""
    shared, automatic = stats_pair()
    stats = automatic._norm_statistics

    class Wrapper(torch.nn.Module):
        def __init__(self, inner, attr):
            super().__init__()
            setattr(self, attr, inner)

    assert automatic_norm_statistics(automatic) is stats
    assert automatic_norm_statistics(Wrapper(automatic, "module")) is stats
    assert automatic_norm_statistics(Wrapper(Wrapper(automatic, "_orig_mod"), "module")) is stats
    assert automatic_norm_statistics(shared) is None and automatic_norm_statistics(Wrapper(shared, "module")) is None

"""method.md section 4 on a real nnU-Net network: a spatially constant input plane (a histogram
broadcast over the image) is removed by instance normalisation; a density map is not.

What the measurement shows, precisely: the first convolution turns a constant plane into a
constant per feature map *except where the kernel overlaps the zero padding*, and instance norm
subtracts the constant. With borders removed (circular padding) the output is unchanged to
float64 round-off. With nnU-Net's zero padding the constant leaks in through the image border
only: a patch-geometry artefact, not voxel-wise information.
"""
import numpy as np
import pytest
import torch

from nnunet_guide.core.density import DensityOptions, HistogramAccumulator
from nnunet_guide.density_network import DensityFeatures, make_density_layout
from nnunet_guide.network import GuidedNetwork


def nnunet_2d_network(in_channels: int, circular: bool = False) -> torch.nn.Module:
    """nnU-Net's 2D PlainConvUNet (as its planner writes it into plans.json), built by nnU-Net."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    n = 4
    arch = {"n_stages": n, "features_per_stage": [16, 32, 64, 128], "conv_op": "torch.nn.modules.conv.Conv2d",
            "kernel_sizes": [[3, 3]] * n, "strides": [[1, 1]] + [[2, 2]] * (n - 1), "n_conv_per_stage": [2] * n,
            "n_conv_per_stage_decoder": [2] * (n - 1), "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d", "norm_op_kwargs": {"eps": 1e-5, "affine": True},
            "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True}}
    torch.manual_seed(0)
    net = get_network_from_plans("dynamic_network_architectures.architectures.unet.PlainConvUNet", arch,
                                 ["conv_op", "norm_op", "dropout_op", "nonlin"], in_channels, 3,
                                 allow_init=True, deep_supervision=False)
    if circular:  # no border: every voxel sees a full neighbourhood
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d) and m.padding != (0, 0):
                m.padding_mode = "circular"
    return net.double().eval()


def phantom(seed=0, size=64):
    """Normalised CT-like slice: organ (~120 HU) with a darker lesion (~70 HU) on -50 HU."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    seg = np.zeros((size, size), np.int16)
    seg[(yy - size / 2) ** 2 / 20 ** 2 + (xx - size / 2) ** 2 / 24 ** 2 <= 1] = 1
    seg[(yy - 28) ** 2 + (xx - 36) ** 2 <= 36] = 2
    hu = np.select([seg == 2, seg == 1], [70.0, 120.0], -50.0) + rng.normal(0, 15, seg.shape)
    fg = hu[seg > 0]
    return ((hu - fg.mean()) / fg.std()).astype(np.float64), seg


def run(net, image, extra):
    with torch.no_grad():
        return net(torch.cat([image, extra], 1))


@pytest.fixture(scope="module")
def image():
    img, _ = phantom()
    return torch.from_numpy(img)[None, None]


def test_constant_plane_is_removed_when_there_are_no_borders(image):
    net = nnunet_2d_network(2, circular=True)
    a = run(net, image, torch.zeros_like(image))
    b = run(net, image, torch.full_like(image, 3.7))
    assert float((a - b).abs().max()) < 1e-9, "a constant plane passed the first instance norm"
    # a spatially varying plane of the same magnitude is seen
    c = run(net, image, 3.7 * torch.sin(torch.arange(64.0, dtype=torch.float64) / 5).view(1, 1, 1, 64).expand_as(image))
    assert float((a - c).abs().max()) > 1e-2


def test_with_zero_padding_a_constant_plane_leaks_only_through_the_border(image):
    """nnU-Net pads with zeros, so a constant plane is not removed exactly; the same network with
    the border taken away (previous test) shows the border is the only way in."""
    net = nnunet_2d_network(2)
    a = run(net, image, torch.zeros_like(image))
    b = run(net, image, torch.full_like(image, 3.7))
    assert float((a - b).abs().max()) > 1e-3
    # circular padding changes nothing but the border handling: same weights, same interior maths
    circ = nnunet_2d_network(2, circular=True)
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), circ.parameters()))


def test_density_map_changes_the_output_of_the_wrapped_network():
    """The real wrapper: nnU-Net network + DensityFeatures. Replacing the density maps by constant
    planes (the pitfall) loses what they say; the maps themselves change the prediction."""
    img, seg = phantom()
    acc = HistogramAccumulator(1, [0, 1, 2], seed=0)
    acc.add_case(phantom(seed=1)[0][None], phantom(seed=1)[1])
    layout = make_density_layout(acc.finalize(32, ["CT"]), DensityOptions(texture=False, case=False), [1.0, 1.0])
    features = DensityFeatures(layout).double()
    x = torch.from_numpy(img)[None, None]
    maps = features(x)
    assert maps.shape == (1, 2, 64, 64)
    tumour_prior = maps[0, 1].numpy()
    assert tumour_prior[seg == 2].mean() > tumour_prior[seg == 1].mean() + 0.3
    for circular in (True, False):
        base = nnunet_2d_network(layout.num_channels, circular=circular)
        net = GuidedNetwork(base, layout, features).eval()
        with torch.no_grad():
            with_maps = net(x)
            const = base(torch.cat([x, maps.mean(dim=(2, 3), keepdim=True).expand_as(maps)], 1))
            zero = base(torch.cat([x, torch.zeros_like(maps)], 1))
        assert float((with_maps - zero).abs().max()) > 1e-2
        if circular:   # constant planes with the maps' means: exactly as if there were no maps
            assert float((const - zero).abs().max()) < 1e-9

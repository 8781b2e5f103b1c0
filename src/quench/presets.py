"""Model presets: each carries the data config its model was trained with (timm style).

A preset is recorded in the artifact at build time, so ``infer``/``eval``/``serve`` never need
preprocessing flags. Pixel statistics are in 0..255 units: ``x = (pixel - mean) / std``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from quench.errors import QuenchError

INTERPOLATIONS: tuple[str, ...] = ("bilinear", "bicubic", "nearest", "lanczos")
# what the engine takes: float32 normalised tensors in ``layout``, or uint8 NHWC RGB pixels
# with the normalisation and layout change folded into the engine's graph
INPUTS: tuple[str, ...] = ("float32", "uint8")

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


@dataclass(frozen=True)
class DataConfig:
    """How an image becomes the model's input tensor."""

    resize: int = 256  # shorter side is resized to this, aspect ratio kept
    crop: int = 224  # then a centred crop x crop square is taken
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    channel_order: str = "RGB"  # or "BGR"
    layout: str = "NCHW"  # or "NHWC": the model's own input layout
    # "uint8": the engine takes the crop's pixels, (crop, crop, 3) RGB, and normalises itself
    input: str = "float32"

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise QuenchError(
                f"interpolation must be one of {', '.join(INTERPOLATIONS)}, "
                f"got {self.interpolation!r}"
            )
        if self.crop <= 0 or self.resize < self.crop:
            raise QuenchError(f"need 0 < crop <= resize, got resize={self.resize} crop={self.crop}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise QuenchError("mean and std need three values (one per channel)")
        if any(s <= 0 for s in self.std):
            raise QuenchError(f"std values must be positive, got {self.std}")
        if self.channel_order not in ("RGB", "BGR"):
            raise QuenchError(f"channel order must be RGB or BGR, got {self.channel_order!r}")
        if self.layout not in ("NCHW", "NHWC"):
            raise QuenchError(f"layout must be NCHW or NHWC, got {self.layout!r}")
        if self.input not in INPUTS:
            raise QuenchError(f"input must be one of {', '.join(INPUTS)}, got {self.input!r}")

    def channel_mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """``mean`` and ``std`` (given in RGB order) in the order of the model's channels."""
        if self.channel_order == "BGR":
            return tuple(self.mean[::-1]), tuple(self.std[::-1])
        return tuple(self.mean), tuple(self.std)

    @property
    def pixels(self) -> bool:
        """Whether the engine takes uint8 pixels (normalisation folded into its graph)."""
        return self.input == "uint8"

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Per-image shape of the engine's input, without the batch dimension."""
        c = self.crop
        return (3, c, c) if self.layout == "NCHW" and not self.pixels else (c, c, 3)

    @property
    def input_dtype(self) -> str:
        """The engine input's element type (a NumPy dtype name)."""
        return self.input

    def as_float(self) -> DataConfig:
        """This config with the engine taking normalised float32 tensors (the source model's)."""
        return replace(self, input="float32")

    def to_dict(self) -> dict[str, Any]:
        """The JSON form; ``input`` only when it is not float32 (what older artifacts hold)."""
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        if d["input"] == "float32":
            del d["input"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataConfig:
        d = dict(d)
        for key in ("mean", "std"):
            d[key] = tuple(float(v) for v in d[key])
        return cls(**d)


@dataclass(frozen=True)
class Preset:
    """A known classifier: its tensor names, data config, labels and where to get it."""

    name: str
    input_name: str
    output_name: str
    data: DataConfig
    labels: str = "imagenet-1k"
    output_kind: str = "logits"  # "logits" or "probabilities"
    description: str = ""
    url: str | None = None
    size: int | None = None  # bytes of the official file, checked after download
    sha256: str | None = None  # when published; otherwise recorded on first download
    opset: int | None = None

    def with_data(self, **changes: Any) -> Preset:
        """A copy with some data-config fields replaced (``None`` values are ignored)."""
        changes = {k: v for k, v in changes.items() if v is not None}
        return replace(self, data=replace(self.data, **changes)) if changes else self


# The ONNX model zoo's Caffe / Caffe2-era classifiers take BGR pixels in 0..255 with the
# channel means subtracted (and some a scale); the values are those of OpenVINO's Open Model Zoo
# for the same models, written here in RGB order. Their tensor names repeat across the zoo
# (data_0 -> prob_1), so most are chosen with --preset rather than detected.
_CAFFE_MEAN = (123.0, 117.0, 104.0)
_CAFFE_ZOO = tuple(
    Preset(
        name=name,
        input_name=inp,
        output_name=out,
        data=DataConfig(mean=mean, std=std, channel_order="BGR"),
        output_kind="probabilities" if softmax else "logits",
        description=f"{what} from the ONNX model zoo (Caffe2 export, opset 8-9), ImageNet-1k",
    )
    for name, inp, out, mean, std, softmax, what in (
        ("bvlc-googlenet", "data_0", "prob_1", _CAFFE_MEAN, (1.0,) * 3, True, "GoogLeNet"),
        ("inception-v2", "data_0", "prob_1", _CAFFE_MEAN, (1.0,) * 3, True, "Inception v2"),
        ("bvlc-alexnet", "data_0", "prob_1", _CAFFE_MEAN, (1.0,) * 3, True, "AlexNet"),
        ("caffenet", "data_0", "prob_1", _CAFFE_MEAN, (1.0,) * 3, True, "CaffeNet"),
        (
            "squeezenet1.0",
            "data_0",
            "softmaxout_1",
            _CAFFE_MEAN,
            (1.0,) * 3,
            True,
            "SqueezeNet 1.0",
        ),
        (
            "vgg19-caffe2",
            "data_0",
            "prob_1",
            (123.68, 116.779, 103.939),
            (1.0,) * 3,
            True,
            "VGG-19",
        ),
        (
            "densenet121-caffe2",
            "data_0",
            "fc6_1",
            (123.68, 116.78, 103.94),
            (58.8,) * 3,
            False,
            "DenseNet-121",
        ),
        (
            "resnet50-caffe2",
            "gpu_0/data_0",
            "gpu_0/softmax_1",
            (123.675, 116.28, 103.53),
            (58.395, 57.12, 57.375),
            True,
            "ResNet-50",
        ),
    )
)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="resnet50-v1-7",
            input_name="data",
            output_name="resnetv17_dense0_fwd",
            data=DataConfig(),
            description="ResNet-50 v1 from the ONNX model zoo (opset 7), ImageNet-1k",
            url="https://github.com/onnx/models/raw/main/vision/classification/resnet/model/"
            "resnet50-v1-7.onnx",
            size=102_583_340,
            opset=7,
        ),
        Preset(
            name="efficientnet-lite0",
            input_name="images",
            output_name="logits",
            data=DataConfig(mean=(127.5, 127.5, 127.5), std=(128.0, 128.0, 128.0)),
            description="EfficientNet-Lite0, ImageNet-1k (PyTorch export, opset 13)",
            opset=13,
        ),
        *_CAFFE_ZOO,
        Preset(
            name="imagenet",
            input_name="",
            output_name="",
            data=DataConfig(),
            description="Any ImageNet classifier: torchvision preprocessing",
        ),
    )
}


def fit_to_input(data: DataConfig, dims: Sequence[int | str]) -> tuple[DataConfig, str | None]:
    """``data`` with the layout and crop of a model input ``[N, 3, S, S]`` or ``[N, S, S, 3]``
    where those differ from its own (the resize keeps the crop's share of the image), and one
    line saying so; ``data`` itself when they agree or the shape says nothing certain."""
    if len(dims) != 4 or not all(isinstance(d, int) for d in dims[1:]):
        return data, None
    _, a, b, c = dims
    if a == 3 and b == c and not (c == 3 and b == 3):
        layout, size = "NCHW", b
    elif c == 3 and a == b:
        layout, size = "NHWC", a
    else:
        return data, None
    assert isinstance(size, int)
    if (layout, size) == (data.layout, data.crop):
        return data, None
    resize = round(size * data.resize / data.crop)
    fitted = replace(data, layout=layout, crop=size, resize=resize)
    return fitted, (
        f"preprocessing: the input is {list(dims)}: {layout}, crop {size}, resize {resize} "
        "(pass --crop/--resize/--layout to change)"
    )


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise QuenchError(
            f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}"
        ) from None


def detect_preset(input_name: str, output_name: str) -> Preset | None:
    """The preset whose tensor names match a model's, if exactly one does."""
    hits = [
        p for p in PRESETS.values() if (p.input_name, p.output_name) == (input_name, output_name)
    ]
    return hits[0] if len(hits) == 1 else None

"""OpenAI's DALL-E dVAE encoder (openai/DALL-E ``dall_e/encoder.py``) in plain torch.

112 px → 14 × 14 logits over 8192 codes (it downsamples by 8); tokens are the argmax. Input
pixels in [0, 1] go through the logit-Laplace map ``(1 - 2 eps) x + eps``, eps 0.1, first.
Parameter names equal OpenAI's (``blocks.group_1.block_1.res_path.conv_1.w``), so their
state converts one-to-one.

Weights load from safetensors only. OpenAI ships ``encoder.pkl``, a pickled ``dall_e``
module object; converting it is the ONLY place this project reads a pickle, once, by hand:

    python -m beit_ray.data.tokenizers.dalle convert --input encoder.pkl \\
        --output dalle_encoder.safetensors --i-trust-this-pickle

The converter does not need the ``dall_e`` package: its classes are mapped to stand-ins that
only capture state; any other non-torch class in the pickle is refused.
"""

from __future__ import annotations

import argparse
import pickle
import sys
from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

LOGIT_LAPLACE_EPS = 0.1


def map_pixels(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] pixels → DALL-E's logit-Laplace input range."""
    return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


class Conv2d(nn.Module):
    """OpenAI's conv: parameters ``w`` [out, in, k, k] and ``b`` [out], 'same' padding."""

    def __init__(self, n_in: int, n_out: int, kw: int) -> None:
        super().__init__()
        self.kw = kw
        self.w = nn.Parameter(torch.empty(n_out, n_in, kw, kw).normal_(std=(n_in * kw**2) ** -0.5))
        self.b = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.w, self.b, padding=(self.kw - 1) // 2)


class EncoderBlock(nn.Module):
    def __init__(self, n_in: int, n_out: int, n_layers: int) -> None:
        super().__init__()
        n_hid = n_out // 4
        self.post_gain = 1 / n_layers**2
        self.id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(
            OrderedDict(
                relu_1=nn.ReLU(), conv_1=Conv2d(n_in, n_hid, 3),
                relu_2=nn.ReLU(), conv_2=Conv2d(n_hid, n_hid, 3),
                relu_3=nn.ReLU(), conv_3=Conv2d(n_hid, n_hid, 3),
                relu_4=nn.ReLU(), conv_4=Conv2d(n_hid, n_out, 1),
            )
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class DalleEncoder(nn.Module):
    """The dVAE encoder: [B, 3, 8g, 8g] mapped pixels → logits [B, vocab, g, g]."""

    def __init__(
        self,
        group_count: int = 4,
        n_hid: int = 256,
        n_blk_per_group: int = 2,
        input_channels: int = 3,
        vocab_size: int = 8192,
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        n_layers = group_count * n_blk_per_group
        groups: list[tuple[str, nn.Module]] = [("input", Conv2d(input_channels, n_hid, 7))]
        n_in = n_hid
        for g in range(group_count):
            width = n_hid * 2**g
            layers: list[tuple[str, nn.Module]] = []
            for i in range(n_blk_per_group):
                layers.append((f"block_{i + 1}", EncoderBlock(n_in, width, n_layers)))
                n_in = width
            if g < group_count - 1:
                layers.append(("pool", nn.MaxPool2d(kernel_size=2)))
            groups.append((f"group_{g + 1}", nn.Sequential(OrderedDict(layers))))
        groups.append(
            ("output", nn.Sequential(OrderedDict(relu=nn.ReLU(), conv=Conv2d(n_in, vocab_size, 1))))
        )
        self.blocks = nn.Sequential(OrderedDict(groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)

    @torch.no_grad()
    def tokenize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, 8g, 8g] → token ids int64 [B, g*g]."""
        x = map_pixels(pixels.float() / 255.0)
        return self(x).argmax(dim=1).flatten(1)


def shape_from_state(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """Constructor arguments that fit a state dict (so smaller test encoders load too)."""
    groups = {k.split(".")[1] for k in state if k.startswith("blocks.group_")}
    blocks = {k.split(".")[2] for k in state if k.startswith("blocks.group_1.")}
    return {
        "group_count": len(groups),
        "n_hid": state["blocks.input.w"].shape[0],
        "n_blk_per_group": len(blocks),
        "input_channels": state["blocks.input.w"].shape[1],
        "vocab_size": state["blocks.output.conv.w"].shape[0],
    }


def load_encoder(path_or_uri: str, storage_cfg: Any = None) -> DalleEncoder:
    """The encoder from a safetensors file (local or URI); no pickle is ever read here."""
    from safetensors.torch import load

    from beit_ray import storage

    state = load(storage.read_bytes(path_or_uri, storage_cfg))
    enc = DalleEncoder(**shape_from_state(state))
    enc.load_state_dict(state)
    return enc.eval()


# --------------------------------------------------------------------------- converter


class _Captured:
    """Stand-in for a ``dall_e`` class: keeps the pickled instance state, nothing else."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_state"] = state


_TORCH_PREFIXES = ("torch", "collections", "builtins", "__builtin__", "copyreg", "_codecs", "numpy")


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("dall_e"):
            return type(name, (_Captured,), {"__module__": "beit_ray.stand_in"})
        if module.split(".")[0] in _TORCH_PREFIXES:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from the pickle")


class _PickleModule:
    """What ``torch.load(pickle_module=...)`` needs: our Unpickler plus pickle's load."""

    Unpickler = _Unpickler
    __name__ = "beit_ray_dalle_pickle"

    @staticmethod
    def load(f: Any, **kw: Any) -> Any:
        return _Unpickler(f, **kw).load()


def _state_of(obj: Any, prefix: str, out: dict[str, torch.Tensor]) -> None:
    """Walk a (stand-in or torch) module tree collecting parameters under dotted names."""
    d = obj.__dict__.get("_state", obj.__dict__)
    if isinstance(d, tuple):  # (dict, slotstate) from some pickle protocols
        d = d[0]
    for name, p in (d.get("_parameters") or {}).items():
        if p is not None:
            out[prefix + name] = p.detach().float().contiguous()
    for name, child in (d.get("_modules") or {}).items():
        if child is not None:
            _state_of(child, f"{prefix}{name}.", out)


def convert(input_path: str, output_path: str) -> dict[str, torch.Tensor]:
    """OpenAI ``encoder.pkl`` → safetensors with :class:`DalleEncoder`'s names (reads a pickle!)."""
    from safetensors.torch import save_file

    with open(input_path, "rb") as f:
        obj = torch.load(f, map_location="cpu", pickle_module=_PickleModule, weights_only=False)
    state: dict[str, torch.Tensor] = {}
    _state_of(obj, "", state)
    expected = DalleEncoder(**shape_from_state(state)).state_dict()
    if set(state) != set(expected):
        raise ValueError(
            f"unexpected encoder layout: missing {sorted(set(expected) - set(state))[:5]}, extra {sorted(set(state) - set(expected))[:5]}"
        )
    save_file(state, output_path)
    return state


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m beit_ray.data.tokenizers.dalle")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser(
        "convert", help="convert OpenAI's encoder.pkl to safetensors (reads a pickle)"
    )
    c.add_argument("--input", required=True)
    c.add_argument("--output", required=True)
    c.add_argument(
        "--i-trust-this-pickle", action="store_true", help="required: unpickling can run code"
    )
    args = ap.parse_args(argv)
    if not args.i_trust_this_pickle:
        ap.error(
            "reading a pickle can run arbitrary code: pass --i-trust-this-pickle for a file you trust"
        )
    state = convert(args.input, args.output)
    print(f"wrote {len(state)} tensors to {args.output}")


if __name__ == "__main__":
    main(sys.argv[1:])

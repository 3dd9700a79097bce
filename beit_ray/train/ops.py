"""Build DeepSpeed's JIT ops once, where a node is set up, instead of inside the first job.

    TORCH_EXTENSIONS_DIR=$PWD/.venv/torch_extensions python -m beit_ray.train.ops

DeepSpeed compiles its C++ ops on first use (45-65 s each on 2 cores) into
``TORCH_EXTENSIONS_DIR``, and concurrent workers queue on the build lock. `make install`,
``cluster/aws.yaml``'s setup_commands and the KubeRay image run this; the nodes' Ray (``ray
start``) must then see the same ``TORCH_EXTENSIONS_DIR``, which its workers inherit.
"""

from __future__ import annotations

import os
import sys

OPS = ("ShareMemCommBuilder", "CPUAdamBuilder")
"""The shared-memory comm op every CPU rank loads, and CPU Adam (optimizer offload)."""


def use_own_ninja() -> None:
    """Put this interpreter's ``bin`` folder first on PATH when it holds ``ninja`` (the venv's
    pip ninja, a DeepSpeed dependency), so every process that builds or loads the ops runs the
    same ninja. Ninja versions keep their build logs in different formats and hashes: a
    prebuild by the system's ninja 1.11 (what ``make``'s PATH finds) looked like "command line
    changed" to the venv's 1.13 (what the README's nodes find, with ``.venv/bin`` first), and the
    first job's workers rebuilt every op, and the other way round."""
    here = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if os.path.exists(os.path.join(here, "ninja")) and path.split(os.pathsep)[0] != here:
        os.environ["PATH"] = here + os.pathsep + path


def prebuild(names: tuple[str, ...] = OPS) -> dict[str, str]:
    """Build each op this machine's accelerator offers, serially; returns name → outcome.

    An op that fails to build here (no compiler on the node, say) is reported, not raised: jobs
    then build it on first use, as without this step.
    """
    from deepspeed.accelerator import get_accelerator

    use_own_ninja()
    out = {}
    for name in names:
        builder = get_accelerator().create_op_builder(name)
        if builder is None or not builder.is_compatible():
            out[name] = f"not used on {get_accelerator().device_name()}"
            continue
        try:
            builder.load()
            out[name] = "built"
        except Exception as e:  # noqa: BLE001 (a node without a compiler still comes up)
            out[name] = f"not built ({type(e).__name__}: {e}); jobs build it on first use"
    return out


if __name__ == "__main__":
    for op, outcome in prebuild().items():
        print(f"{op}: {outcome}", flush=True)
    sys.exit(0)

"""The working-set estimate: from headers alone, a bound on what fingerprinting really uses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tg_verify.artifact import resolve
from tg_verify.artifact.model import Artifact, ArtifactFile, TensorInfo
from tg_verify.scale.memory import RUNTIME_BYTES, working_set
from tg_verify.tiny import build_model, save_model


def _llama_7b() -> Artifact:
    """A Llama-2-7B-shaped artifact (bf16), headers only: 32 layers, hidden 4096, MLP 11008, vocab 32000."""
    shapes = {"model.embed_tokens.weight": (32000, 4096), "lm_head.weight": (32000, 4096), "model.norm.weight": (4096,)}
    for n in range(32):
        p = f"model.layers.{n}."
        shapes.update({p + "self_attn.q_proj.weight": (4096, 4096), p + "self_attn.k_proj.weight": (4096, 4096),
                       p + "self_attn.v_proj.weight": (4096, 4096), p + "self_attn.o_proj.weight": (4096, 4096),
                       p + "mlp.gate_proj.weight": (11008, 4096), p + "mlp.up_proj.weight": (11008, 4096),
                       p + "mlp.down_proj.weight": (4096, 11008), p + "input_layernorm.weight": (4096,),
                       p + "post_attention_layernorm.weight": (4096,)})
    tensors, offset = [], 0
    for name, shape in sorted(shapes.items()):
        size = 2 * int.__mul__(*shape) if len(shape) == 2 else 2 * shape[0]
        tensors.append(TensorInfo(name, "BF16", shape, "model.safetensors", offset, offset + size))
        offset += size
    return Artifact(Path("/nowhere"), "llama-7b", "single", (ArtifactFile("model.safetensors", offset, "weights"),),
                    tuple(tensors))


def test_a_7b_model_needs_its_largest_tensors_not_its_files() -> None:
    artifact = _llama_7b()
    files = artifact.files[0].size
    one, two, eight = (working_set(artifact, threads) for threads in (1, 2, 8))
    assert files > 13e9  # 6.7B parameters in bf16
    assert RUNTIME_BYTES < one < two < eight
    assert two < 2 * 2**30 < files / 6  # under 2 GiB with two threads: a node holds many such jobs
    assert working_set(artifact, 2, base=artifact) > two  # merging an adapter holds float32 copies too


def test_the_estimate_bounds_the_measured_peak(tmp_path: Path) -> None:
    model = save_model(build_model("llama", seed=3, vocab_size=32000, hidden_size=1024, intermediate_size=2816),
                       tmp_path / "model")  # a 128 MB float32 embedding and head: they dominate
    estimate = working_set(resolve(model), 2)
    # VmHWM: this process's own peak RSS (ru_maxrss would carry the parent's over fork and exec)
    script = ("import json, sys\nfrom tg_verify.batch import fingerprint_model\n"
              "from tg_verify.fingerprint.settings import FingerprintSettings\n"
              "fingerprint_model(sys.argv[1], FingerprintSettings(device='cpu'), threads=2)\n"
              "print([int(line.split()[1]) * 1024 for line in open('/proc/self/status')\n"
              "       if line.startswith('VmHWM')][0])")
    result = subprocess.run([sys.executable, "-c", script, str(model)], capture_output=True, text=True, check=True)
    peak = json.loads(result.stdout.strip().splitlines()[-1])
    assert peak < estimate, (peak, estimate)
    assert estimate < 4 * peak  # a bound, not a blanket reservation

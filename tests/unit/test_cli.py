"""The command line as a user runs it: make-model, and offline generate on a folder or the demo model."""
import os
import subprocess
import sys

from pdpipe.models.loader import load_model


def pdpipe(*args, env=None):
    return subprocess.run([sys.executable, "-m", "pdpipe.cli", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def test_make_model_then_generate(tmp_path):
    out = pdpipe("make-model", str(tmp_path / "m"), "--arch", "qwen3", "--layers", "1", "--hidden", "32",
                 "--heads", "2", "--kv-heads", "1", "--seed", "2")
    assert out.returncode == 0, out.stderr
    model = load_model(tmp_path / "m")
    assert model.spec.architecture == "Qwen3ForCausalLM" and model.spec.num_layers == 1
    gen = pdpipe("generate", "--model", str(tmp_path / "m"), "--prompt", "hello", "--max-tokens", "5",
                 "--chat")
    assert gen.returncode == 0, gen.stderr
    assert "5 tokens in" in gen.stdout and "[5 tokens, length]" in gen.stdout


def test_demo_model_is_made_on_first_use_and_cached(tmp_path):
    env = {"PDPIPE_CACHE_DIR": str(tmp_path)}
    first = pdpipe("generate", "--max-tokens", "3", env=env)
    assert first.returncode == 0, first.stderr
    (demo,) = tmp_path.glob("demo-llama-*")
    stamp = (demo / "model.safetensors").stat().st_mtime_ns
    again = pdpipe("generate", "--max-tokens", "3", env=env)
    assert again.returncode == 0 and (demo / "model.safetensors").stat().st_mtime_ns == stamp
    assert first.stdout.splitlines()[:4] == again.stdout.splitlines()[:4]  # greedy: same text again


def test_errors_are_one_clear_line(tmp_path):
    bad_arch = pdpipe("make-model", str(tmp_path / "x"), "--arch", "gpt2")
    assert bad_arch.returncode == 2 and "invalid choice: 'gpt2'" in bad_arch.stderr
    bad_dir = pdpipe("generate", "--model", str(tmp_path / "nowhere"))
    assert bad_dir.returncode == 2
    assert bad_dir.stderr.startswith("pdpipe: error:") and "not a directory" in bad_dir.stderr
    bad_size = pdpipe("make-model", str(tmp_path / "y"), "--heads", "3", "--kv-heads", "2")
    assert bad_size.returncode == 2 and "kv_heads" in bad_size.stderr

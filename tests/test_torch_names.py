"""bench/torch_names.py, the check that every torch name the code uses exists in a given torch (docs/gpu.md)."""
from test_bench_device import load_bench


def test_every_torch_name_of_the_code_resolves_here(capsys):
    assert load_bench("torch_names").main([]) == 0
    out = capsys.readouterr().out
    assert "all resolve" in out and int(out.split(": ")[1].split()[0]) > 100  # the whole code was read


def test_a_name_this_torch_lacks_is_named_and_fails(tmp_path, capsys):
    planted = tmp_path / "planted.py"
    planted.write_text("import torch\nimport torch.nn.functional as F\nfrom torch.amp import no_such_import\n\n"
                       "torch.cuda.synchronize()\ntorch.cuda.no_such_api()\nF.elu(x)\nF.no_such_function(x)\n")
    assert load_bench("torch_names").main([str(planted)]) == 1
    line = capsys.readouterr().out
    missing = set(line.split("missing: ")[1].strip().split(", "))
    assert missing == {"torch.amp.no_such_import", "torch.cuda.no_such_api", "torch.nn.functional.no_such_function"}

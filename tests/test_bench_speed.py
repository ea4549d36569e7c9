"""bench/speed.py prints its plain, fast and auto rows side by side (what docs/speed.md's tables come from)."""
import os
import subprocess
import sys

from conftest import REPO


def test_speed_prints_plain_fast_and_the_auto_path_config_yml_runs(tmp_path):
    env = {**os.environ, "NCSN_SPEED_CACHE": str(tmp_path / "cache.json")}
    out = subprocess.run([sys.executable, os.path.join(REPO, "bench", "speed.py"), "--ngf", "4", "--batch", "4",
                          "--repeats", "1", "--matmul_n", "256", "--devices", "cpu"],
                         capture_output=True, text=True, env=env, timeout=600).stdout
    rows = [line.split(" | ")[1] for line in out.splitlines() if line.startswith("| 4 |")]
    auto_train = out.split("auto, ngf 4, train: ")[1].split(",")[0]
    assert rows[:2] == ["plain", "fast"] and rows[2].startswith(f"auto ({auto_train}"), out
    assert rows[3:] == ["fast / plain", rows[2] + " / plain"], out
    memory = [line.rstrip(" |").split(" | ")[-1] for line in out.splitlines() if line.startswith("| 4 |")][:3]
    assert memory[0].endswith("GiB)") and memory[1].endswith("GiB)") and memory[2] == "not measured", out
    assert "timed here (" in out and os.path.exists(tmp_path / "cache.json")

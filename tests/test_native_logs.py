"""`atl` (and tools/main_job.py) drop ScaNN's Abseil INFO/WARNING lines, which
TF_CPP_MIN_LOG_LEVEL does not reach, and keep everything else on stderr."""

from __future__ import annotations

import os
import subprocess
import sys

from atl_keras.cli.native_logs import is_quiet_line
from conftest import REPO_ROOT

#: Builds a ScaNN tree over data with an empty partition: ScaNN logs "Could not normalize
#: centroid due to zero norm" at WARNING and its partitioner timings at INFO.
SCANN_BUILD = """
import sys
import numpy as np
{wrap}
def build():
    import scann
    db = np.zeros((3000, 16), np.float32); db[:, 0] = 1
    db[1500:] = np.random.default_rng(0).normal(size=(1500, 16))
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    scann.scann_ops_pybind.builder(db, 10, "dot_product").tree(
        num_leaves=60, num_leaves_to_search=5, training_sample_size=3000, spherical=True
    ).score_brute_force().build()
    print("python says hello", file=sys.stderr)
{call}
"""


def run(wrap: str, call: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run([sys.executable, "-c", SCANN_BUILD.format(wrap=wrap, call=call)],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stderr


def test_scann_abseil_lines_are_dropped_and_the_rest_kept():
    plain = run("", "build()")
    assert "Could not normalize centroid" in plain  # the noise this filters, unfiltered
    quiet = run("from atl_keras.cli.native_logs import filtered_native_stderr",
                "with filtered_native_stderr():\n    build()\n    import os; os.write(2, b'E1207 native error\\n')")
    assert "Could not normalize centroid" not in quiet and "absl::InitializeLog" not in quiet
    assert "python says hello" in quiet and "E1207 native error" in quiet


def test_quiet_lines_are_abseil_info_and_warning_only():
    assert is_quiet_line(b"I0000 00:00:1796617843.818500   11164 partitioner_factory_base.cc:58] Size")
    assert is_quiet_line(b"W1207 04:30:43.819055   11164 gmm_utils.cc:1026] Could not normalize centroid")
    assert not is_quiet_line(b"E0000 00:00:1796617843.818500   11164 server.cc:1] bind failed")
    assert not is_quiet_line(b"Indexed 40 images")

"""OpenMP spin-wait default: set only when the user chose neither a policy nor a spin count."""

from __future__ import annotations

import os
import subprocess
import sys

from trt_gemma import cpu_env


def test_bounded_spin_wait_respects_the_users_choice():
    env: dict[str, str] = {}
    assert cpu_env.bounded_spin_wait(env) and env == {"GOMP_SPINCOUNT": cpu_env.SPIN_COUNT}
    for chosen in ({"OMP_WAIT_POLICY": "PASSIVE"}, {"GOMP_SPINCOUNT": "0"}):
        env = dict(chosen)
        assert not cpu_env.bounded_spin_wait(env) and env == chosen


def test_import_trt_gemma_sets_it_in_a_fresh_process():
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    code = "import os, trt_gemma; print(os.environ.get('GOMP_SPINCOUNT'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == [cpu_env.SPIN_COUNT]

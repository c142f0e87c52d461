"""host_malloc: when a command restarts itself with glibc's huge-page tunable, and what it passes on."""

import os
import subprocess
import sys

import pytest

from chameleon_jax import host_malloc


def test_the_tunable_is_added_once_and_other_tunables_are_kept():
    env = host_malloc.with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=0", "A": "1"})
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert env["A"] == "1"
    assert host_malloc.with_huge_pages(env) == env
    assert host_malloc.with_huge_pages({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"


def test_not_wanted_when_opted_out_already_set_restarted_or_on_an_accelerator(monkeypatch):
    monkeypatch.setattr(host_malloc, "_glibc_supports_hugetlb", lambda: True)
    monkeypatch.setattr(host_malloc, "_thp_on_request", lambda: True)
    monkeypatch.setattr(sys, "platform", "linux")
    assert host_malloc.wanted({"JAX_PLATFORMS": "cpu"})
    assert not host_malloc.wanted({"JAX_PLATFORMS": "cpu", "CHAMELEON_JAX_MALLOC": "system"})
    assert not host_malloc.wanted({"JAX_PLATFORMS": "cpu", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})
    assert not host_malloc.wanted({"JAX_PLATFORMS": "cpu", host_malloc._REEXECED: "1"})
    assert not host_malloc.wanted({"JAX_PLATFORMS": "cuda"})
    monkeypatch.setattr(host_malloc, "_thp_on_request", lambda: False)
    assert not host_malloc.wanted({"JAX_PLATFORMS": "cpu"})


@pytest.mark.skipif(not (sys.platform == "linux" and host_malloc._glibc_supports_hugetlb()
                         and host_malloc._thp_on_request()), reason="needs glibc >= 2.35 and THP in madvise mode")
def test_a_command_restarts_once_with_the_tunable_and_keeps_its_arguments(tmp_path):
    script = tmp_path / "cmd.py"
    script.write_text(
        "import os, sys\n"
        "from chameleon_jax import host_malloc\n"
        "print('start', flush=True)\n"
        "host_malloc.reexec_with_huge_pages()\n"
        "print('args', sys.argv[1:], 'tunables', os.environ.get('GLIBC_TUNABLES'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "CHAMELEON_JAX_MALLOC")}
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    out = subprocess.run([sys.executable, str(script), "a=1", "b two"], env=env, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out == ["start", "start", "args ['a=1', 'b two'] tunables glibc.malloc.hugetlb=1"]
    env["CHAMELEON_JAX_MALLOC"] = "system"
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out == ["start", "args [] tunables None"]

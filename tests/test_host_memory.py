"""The allocator setting of the entry points: freed blocks come back without page faults."""
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")

# Steps of mixed block sizes (4-12 MiB), then two 24 MiB blocks taken and freed 20 times; prints the setting's
# result and the minor page faults the last 20 rounds took.
PROBE = """
import resource, torch
from unipt_scale.host_memory import retain_freed_memory
applied = retain_freed_memory() if {retain} else None
torch.ones(1000)
for sizes in ([1 << 20] * 3, [3 << 20, 1 << 20, 2 << 20]):
    for _ in range(20):
        blocks = [torch.ones(s) for s in sizes]
        del blocks
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    blocks = [torch.ones(6 << 20), torch.ones(6 << 20)]
    del blocks
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""
PAGES_PER_ROUND = 2 * (24 << 20) // 4096


def _probe(retain: bool, **env) -> tuple:
    out = subprocess.run([sys.executable, "-c", PROBE.format(retain=retain)], capture_output=True, text=True,
                         env={**os.environ, **env}, check=True).stdout.split()
    return out[0], int(out[1])


def test_freed_blocks_are_reused_without_faults():
    applied, retained = _probe(True)
    assert applied == "True"
    # Retained, only the first round touches new pages. (glibc's own defaults vary here with the heap's layout,
    # from about 2 rounds' pages to every round's, so they are not asserted.)
    assert retained < 2 * PAGES_PER_ROUND


def test_system_allocator_is_kept_when_asked():
    applied, _ = _probe(True, UNIPT_HOST_MALLOC="system")
    assert applied == "False"


def test_the_command_line_applies_it(monkeypatch):
    from unipt_scale import cli, host_memory

    calls = []
    monkeypatch.setattr(cli, "retain_freed_memory", lambda: calls.append(1) or True)
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert calls == [1]
    assert host_memory.retain_freed_memory() in (True, False)

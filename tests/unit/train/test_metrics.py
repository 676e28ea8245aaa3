"""Peak memory as the trainer reports it: its own, not its parent's."""

import subprocess
import sys
import textwrap

CHILD = textwrap.dedent("""
    import json, resource
    from mft_core.train.metrics import peak_rss_mb
    print(json.dumps({"own": peak_rss_mb(), "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
""")


def test_a_child_of_a_big_process_reports_its_own_peak_not_the_parents():
    # The parent touches 600 MB, then starts a small child (as the flow starts the trainer).
    parent = textwrap.dedent(f"""
        import subprocess, sys
        block = bytearray(600 * 2**20)
        block[::4096] = b"x" * len(block[::4096])
        print(subprocess.run([sys.executable, "-c", {CHILD!r}], capture_output=True, text=True, check=True).stdout)
    """)
    import json

    done = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, check=True)
    child = json.loads(done.stdout.strip())
    assert child["ru_maxrss"] > 600  # the trap: getrusage counts the parent's memory at spawn time
    assert child["own"] < 300, child  # an interpreter that imported little


def test_peak_follows_this_processes_allocations():
    script = textwrap.dedent("""
        import json
        from mft_core.train.metrics import peak_rss_mb
        before = peak_rss_mb()
        block = bytearray(300 * 2**20)
        block[::4096] = b"x" * len(block[::4096])
        del block
        print(json.dumps([before, peak_rss_mb()]))
    """)
    import json

    before, after = json.loads(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                              check=True).stdout)
    assert after - before > 290  # a high-water mark: it stays up after the block is freed

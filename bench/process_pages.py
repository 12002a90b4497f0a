"""Memory figures the training benches sample, from /proc: imported by the processes they
start (bench/training.py's workers, bench/distributed.py's ranks)."""


def private_kib(pid):
    """A process's own pages (KiB): for a forked child, those the parent wrote since the fork."""
    total = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith(("Private_Dirty:", "Private_Clean:")):
                    total += int(line.split()[1])
    except OSError:  # the child has ended
        pass
    return total


def rss_anon_kib():
    """This process's anonymous resident memory (KiB)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    return 0

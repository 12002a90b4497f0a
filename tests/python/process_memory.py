"""The process's own memory figures, for the tests that bound them."""


def rss_anon():
    """This process's RssAnon (private resident memory), in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon in /proc/self/status")

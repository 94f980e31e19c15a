"""The --listen argument of the test servers: 127.0.0.1 only, so that no test server is ever
reachable from outside the host. Port 0 asks the kernel for a free one (the server prints it)."""
import argparse


def parse_listen(value):
    host, _, port = value.rpartition(":")
    if host != "127.0.0.1":
        raise argparse.ArgumentTypeError("only 127.0.0.1 is allowed as a listen address")
    return host, int(port)

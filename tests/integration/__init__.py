"""Tests beyond the fast unit loop, run by `make test` after `make check`: they need no root
but more than one Python process and a moment -- the macOS and Windows adapters against
stand-in programs (standins/), the Debian package built and resolved with dpkg, lintian and
apt, threads and sockets on a real clock, and the exhaustive comparisons of the rendered
rules with verdict() (every packet of the fixed cases, hypothesis-generated policies)."""

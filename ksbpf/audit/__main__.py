"""`python -m ksbpf.audit worker`: the audit's worker child, started by `ksctl audit`."""

import sys

from ksbpf.audit.report import EXIT_BAD_INPUT

if sys.argv[1:] == ["worker"]:
    from ksbpf.audit.worker import main

    sys.exit(main())
print("usage: python -m ksbpf.audit worker  (run by `ksctl audit`)", file=sys.stderr)
sys.exit(EXIT_BAD_INPUT)

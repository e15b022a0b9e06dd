from ftq.cli import main

raise SystemExit(main(supervise=True))

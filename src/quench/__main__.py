from quench.cli import run

run()

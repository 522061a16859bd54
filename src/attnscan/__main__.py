from attnscan.cli import run

run()

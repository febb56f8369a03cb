import sys

from gptjax.cli import command

sys.exit(command())

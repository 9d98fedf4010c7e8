"""``python -m clipdistill.train CONFIG...``: the entry point ``torchrun`` launches."""

from __future__ import annotations

import typer

from clipdistill.cli.common import reports_user_errors
from clipdistill.cli.train_cmd import train_command


def main() -> None:
    typer.run(reports_user_errors(train_command))


if __name__ == "__main__":
    main()

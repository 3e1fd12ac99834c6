"""`python -m export [RUN]`: the export command; without RUN, the latest run of each kind under runs/."""

from export.cli import export_command

if __name__ == "__main__":
    export_command(prog_name="python -m export")

"""The ``conveyor`` command line.

Every option can also come from the environment variable shown in ``--help``. ``root`` holds
the group and its global options; each other module holds the commands of one concern, and
this one puts them together under ``main`` (the ``conveyor`` script's entry point).
"""

from conveyor.cli import dead_letters, groups, inspecting, producing, running
from conveyor.cli.root import main
from conveyor.cli.running import SETTINGS_ENV, worker_process

main.add_command(running.worker)
main.add_command(running.worker_process)
main.add_command(running.history_writer)
main.add_command(running.dashboard)
main.add_command(running.demo)
main.add_command(producing.enqueue)
main.add_command(inspecting.stats)
main.add_command(inspecting.top)
main.add_command(inspecting.history)
main.add_command(inspecting.schedule)
main.add_command(dead_letters.dlq)
main.add_command(groups.rate_limit)
main.add_command(groups.pause)
main.add_command(groups.resume)

__all__ = ["SETTINGS_ENV", "main", "worker_process"]

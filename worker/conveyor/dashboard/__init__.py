"""``conveyor dashboard``: a live web view of one queue, with replay, purge, pause and resume.

The page (plain HTML, CSS and JavaScript shipped in ``pages/`` and ``static/``) follows the
queue through server-sent events fed by the Redis events stream (``feed``), asks the JSON API
(``api``) for dead letters and job histories, and posts actions through it. Access takes the
dashboard token (``auth``).
"""

from conveyor.dashboard.app import create_app, serve
from conveyor.dashboard.settings import DashboardSettings

__all__ = ["DashboardSettings", "create_app", "serve"]

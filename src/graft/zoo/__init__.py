"""graft's offline real-data zoo: digit tasks, and the base / fine-tunes / soup built on them."""

from graft.zoo._report import ZooQualityError
from graft.zoo.build import Zoo, ZooError, build_zoo, load_zoo, soup_head
from graft.zoo.tasks import TASKS, TaskSpec, task_data

__all__ = [
    "TASKS",
    "TaskSpec",
    "Zoo",
    "ZooError",
    "ZooQualityError",
    "build_zoo",
    "load_zoo",
    "soup_head",
    "task_data",
]

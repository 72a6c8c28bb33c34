"""Analyses of finished runs that need no generation: task vectors and their similarity between methods."""

from piggy_lightning.analysis.task_vectors import layer_cosines, load_task_vector, task_vector_from_state

__all__ = ["layer_cosines", "load_task_vector", "task_vector_from_state"]

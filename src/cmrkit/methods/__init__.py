from .base import METHODS, ContinualMethod, TaskContext, build_method, register

__all__ = ["METHODS", "ContinualMethod", "TaskContext", "build_method", "register"]

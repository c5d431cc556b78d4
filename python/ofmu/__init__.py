from .backends import backend_info

"""nvit.profiler"""

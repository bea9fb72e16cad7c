"""nvit.pruning"""

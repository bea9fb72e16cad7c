"""nvit.export"""

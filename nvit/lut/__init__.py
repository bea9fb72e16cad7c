"""nvit.lut"""

"""splice.surgery"""

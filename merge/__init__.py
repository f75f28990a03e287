"""splice.merge"""

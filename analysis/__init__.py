"""splice.analysis"""

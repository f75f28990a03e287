"""splice.evolve"""

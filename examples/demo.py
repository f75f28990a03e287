"""Demo placeholder until the zoo lands: build a tiny model and inspect it."""

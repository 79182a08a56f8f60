"""The tooling for a lent GPU machine without internet (docs/h200.md): the wheels it lacks, the one call that
runs the real pipeline, the accuracy study and airbench there (session.sh), and its grids."""

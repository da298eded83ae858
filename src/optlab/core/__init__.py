"""What every stage shares: the params schema, the user's error, atomic outputs, the stage shell."""

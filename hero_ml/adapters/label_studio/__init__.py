"""Label Studio: HERO rounds as tasks (rounds.py, pure), the server through label-studio-sdk (client.py)."""

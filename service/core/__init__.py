"""What every domain stands on: settings, the database and Redis clients, the tables,
logs, advisory locks, domain errors, and riding out a server's absence."""

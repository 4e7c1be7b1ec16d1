"""End-to-end tests: each compiles the train step or runs whole commands (minutes on a 2-core
CPU). They run in the default suite; `-m "not end_to_end"` leaves them out of a quick loop."""

"""The bundled demo models (`demo`, `demo-moe`) and the script that trains them (`train_demo`)."""

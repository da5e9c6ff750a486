from moe_export.cli import main

main()

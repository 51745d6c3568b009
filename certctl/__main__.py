from certctl.cli import main

main()

from bonetumor.cli import main

main()

from sessions_app.app import main

main()

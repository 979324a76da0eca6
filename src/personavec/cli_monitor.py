"""`personavec monitor-eval`: does the last-prompt-token projection predict the trait of the answer?"""

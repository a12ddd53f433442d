/* llm-router dashboard */
